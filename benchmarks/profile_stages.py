"""Where the engine's time goes at W1 shape: its simulate split into stages, each jit(vmap)-ed alone.

    python benchmarks/run.py --workload profile [--chunk 64] [--variants] --json profile.json

Stages (the engine's own public functions, called in the order simulate calls them):

* ``draw``: world, preference data (prompts, μ draws, labels), training prompts and
  uniforms, evaluation prompts, fresh prompts and uniforms;
* ``reward_fit``: the ridge Bradley-Terry Newton fit;
* ``sgd``: learners.train_policies on the whole chunk (T steps and the checkpoint gradient norms);
* ``evaluation``: log μ, gap.prompt_stats and gap.population on the M evaluation prompts
  (``evaluation_no_quantiles`` without the weighted quantiles: the difference is the quantile computation);
* ``j_hat``: Ĵ on the fresh and on the training sample, decomposition;
* ``catalogue``: catalogue.bound_columns (B1, B7, B3, B2 Occam, B2 Gaussian); its B2 parts alone.

Each stage materialises its outputs, so the sum of the stages is not exactly the fused whole;
``whole`` is the engine's chunk kernel itself. Per-problem stages run vmapped in blocks of
``simulate.default_finish_block()`` problems (16 on CPU), as the engine runs its finishing stages.

With ``--variants``: the whole kernel at several chunk sizes; the SGD stage against two rewrites
kept from the profile that led to ``learners.train_policies`` (the per-problem maths vmapped with
``lax.scan`` unrolled, and the problem-axis-last prototype), checked against the engine's
``train_policies`` on the same data; the draw stage under the ``threefry2x32``, ``rbg`` and
``unsafe_rbg`` PRNGs (the engine's prompt draws use ``counter_rng``; its keys are threefry).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import common
from common import W1

F32 = jnp.float32


def log(msg):
    sys.stderr.write(f"[profile {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def _time(fn: Callable, args: tuple, repeats: int = 3) -> dict[str, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(ts), "all": ts, "compile_s": compile_s}, out


def stage_functions(spec):
    from rlhf_bounds import gap, learners, reward, world
    from rlhf_bounds.simulate import problem_keys
    n, K, M = spec.prompts, spec.rollouts, spec.eval_prompts

    def draw(key):
        keys = problem_keys(key)  # the engine's key layout
        wd = world.draw_world(spec, keys.world)
        prefs = reward.draw_preferences(spec, wd, keys.preferences)
        k_tp, k_tu = jax.random.split(keys.train)
        train = world.draw_prompts(spec, wd, k_tp, n)
        ev = world.draw_prompts(spec, wd, keys.eval, M)
        k_fp, k_fu = jax.random.split(keys.fresh)
        fresh = world.draw_prompts(spec, wd, k_fp, n)
        return dict(world=wd, pref_u=prefs.u, pref_z=prefs.z, train=train,
                    u_t=jax.random.uniform(k_tu, (n, K), F32), ev=ev, fresh=fresh,
                    u_f=jax.random.uniform(k_fu, (n, K), F32), k_post=jax.random.key_data(keys.posterior))

    def fit(d):
        return reward.fit_bradley_terry(d["pref_u"], d["pref_z"], spec.ridge, spec.newton_steps)

    def train_data(d, theta_hat):
        return learners.TrainData(d["train"].phi, d["train"].phi @ theta_hat, d["u_t"])

    def sgd_batch(d, theta_hat, idx):  # all problems of the chunk at once, as the engine trains them
        data = jax.vmap(train_data)(d, theta_hat)
        return learners.train_policies(spec, data, d["world"].w_ref, idx)

    def eval_stats(d, theta_hat, w):
        wd, ev = d["world"], d["ev"]
        log_mu = jax.vmap(lambda phi: world.behaviour_log_probs(spec, wd, phi))(ev.phi)
        evalset = gap.EvalSet(ev.phi, ev.phi @ theta_hat, world.true_reward(spec, wd, ev), log_mu)
        return gap.prompt_stats(w, wd.w_ref, evalset, spec.beta, spec.tau), log_mu

    def evaluation(d, theta_hat, w):
        stats, log_mu = eval_stats(d, theta_hat, w)
        return gap.population(stats), stats, log_mu

    def evaluation_no_quantiles(d, theta_hat, w):
        stats, _ = eval_stats(d, theta_hat, w)
        return gap.population_means(stats)

    def j_hat(d, theta_hat, w, pop):
        wd, fr = d["world"], d["fresh"]
        jf = gap.sample_objective(w, wd.w_ref, fr.phi, fr.phi @ theta_hat, d["u_f"], spec.beta, spec.tau)
        td = train_data(d, theta_hat)
        jt = gap.sample_objective(w, wd.w_ref, td.phi, td.reward, td.u, spec.beta, spec.tau)
        out = dict(gap.decompose(*jf, pop))
        out.update({f"{k}_train": v for k, v in gap.decompose(*jt, pop).items()})
        return out

    return dict(draw=draw, fit=fit, sgd_batch=sgd_batch, evaluation=evaluation, evaluation_no_quantiles=evaluation_no_quantiles,
                j_hat=j_hat, train_data=train_data)


def engine_core(spec, finish_block="auto"):
    """The engine's chunk kernel without the bound catalogue: draw, BT fit, SGD, evaluation, Ĵ, decomposition.

    ``simulate.SimulateKernel(catalogue=False)`` through ``engine.chunk_kernel``, so timing it beside
    the whole kernel shows what the catalogue costs.
    Returns per-problem results; call as ``kernel(problems_key, shared_key, idx)``.
    """
    from rlhf_bounds import engine
    from rlhf_bounds.simulate import SimulateKernel

    kernel = SimulateKernel(finish_block, catalogue=False)
    return jax.jit(lambda pk, sk, idx: engine.chunk_kernel(spec, pk, sk, idx, kernel=kernel))


def problem_builder(spec):
    """A function (stage data of one problem) → ``catalogue.Problem``, built as ``simulate.finish`` builds it."""
    from rlhf_bounds import catalogue, learners

    def problem(d, theta_hat, fit_grad, w, stats, pop, log_mu):
        wd, ev = d["world"], d["ev"]
        data = learners.TrainData(d["train"].phi, d["train"].phi @ theta_hat, d["u_t"])
        evalset = catalogue.EvalSet(ev.phi, ev.phi @ theta_hat, ev.phi @ wd.theta_star, log_mu)
        rr = 2.0 * jnp.linalg.norm(theta_hat) * spec.feature_bound
        lr_range = 2.0 * spec.feature_bound * jnp.linalg.norm(w - wd.w_ref)
        key = jax.random.wrap_key_data(d["k_post"])
        # by field name: the Problem tuple gains and loses fields as the catalogue grows
        avail = dict(w=w, w_ref=wd.w_ref, data=data, evalset=evalset, stats=stats, pop=pop, theta_hat=theta_hat,
                     theta_star=wd.theta_star,
                     pref_u=d["pref_u"], pref_z=d["pref_z"], fit_grad_norm=fit_grad, reward_range=rr,
                     log_ratio_range=lr_range, key=key)
        return catalogue.Problem(**{f: avail[f] for f in catalogue.Problem._fields})
    return problem


def catalogue_functions(spec):
    """(bound_columns, {part: fn}) of the engine's catalogue for a problem built like simulate does, or None."""
    try:
        from rlhf_bounds import catalogue
    except ImportError:
        return None
    problem = problem_builder(spec)
    fns = {"catalogue": lambda *a: catalogue.bound_columns(spec, problem(*a))}
    for part in ("b2_gauss", "b2_occam"):
        fns[f"catalogue_{part}"] = (lambda f: (lambda *a: f(spec, problem(*a))))(getattr(catalogue, f"{part}_columns"))
    return fns


def catalogue_parts(spec) -> dict[str, Callable]:
    """The bound catalogue by part, each a function of a ``catalogue.Problem`` (``spec.bounds`` = 'all').

    Top level: every bound, the ``bounds='b1'`` set (B1, B7, B3, B4 inputs), B2 Occam, B2 Gaussian;
    then the Gaussian posterior's pieces, as far as this version of the catalogue names them.
    """
    from rlhf_bounds import catalogue, learners, ou
    b1 = spec.replace(bounds="b1")
    parts = {
        "every bound (bounds='all')": lambda p: catalogue.bound_columns(spec, p),
        "B1, B1 certified + B7, B3, B4 inputs (bounds='b1')": lambda p: catalogue.bound_columns(b1, p),
        "B2 Occam": lambda p: catalogue.b2_occam_columns(spec, p),
        "B2 Gaussian": lambda p: catalogue.b2_gauss_columns(spec, p),
    }
    if hasattr(catalogue, "gauss_posterior"):
        parts["B2 Gaussian: posterior (H, C_g, Σ_OU, KL grid)"] = lambda p: catalogue.gauss_posterior(spec, p)
        parts["B2 Gaussian: posterior and Monte Carlo draws"] = lambda p: catalogue.gauss_draws(
            spec, p, catalogue.gauss_posterior(spec, p))
    else:
        parts["B2 Gaussian: posterior (H, C_g, Σ_OU)"] = lambda p: ou.stationary_covariance(
            ou.objective_hessian(spec, p.data, p.w, p.w_ref), ou.gradient_covariance(spec, p.data, p.w, p.w_ref),
            spec.lr, learners.batch_size(spec))
    parts["B2 Gaussian: H alone (-∇²F_S)"] = lambda p: ou.objective_hessian(spec, p.data, p.w, p.w_ref)
    return parts


def catalogue_profile(chunk: int = 64, repeats: int = 3, seed: int = 0, bounds: str = "all") -> dict[str, Any]:
    """Each part of the bound catalogue timed alone (jit of ``catalogue_parts``, in the engine's finishing
    blocks) on ``chunk`` W1 problems drawn and trained as the engine does; ms per problem and share of the
    whole catalogue."""
    from rlhf_bounds import engine, learners
    from rlhf_bounds.simulate import default_finish_block
    spec = common.w1_spec(W1).replace(bounds=bounds).validate()
    f = stage_functions(spec)
    pk, sk = engine.problem_keys(seed)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(pk, jnp.arange(chunk, dtype=jnp.int32))
    mb = learners.minibatch_indices(spec, sk)
    fb = default_finish_block() or chunk
    with jax.threefry_partitionable(False):
        d = jax.jit(jax.vmap(f["draw"]))(keys)
        fit = jax.jit(jax.vmap(f["fit"]))(d)
        pol = jax.jit(f["sgd_batch"])(d, fit.theta, mb)
        pop, stats, log_mu = jax.jit(jax.vmap(f["evaluation"]))(d, fit.theta, pol.w_last)
        args = (d, fit.theta, fit.grad_norm, pol.w_last, stats, pop, log_mu)
        problem = problem_builder(spec)
        nb = chunk // fb if chunk % fb == 0 else 1
        size = chunk // nb

        def blocked(g):
            def run(*a):
                a = jax.tree_util.tree_map(lambda x: x.reshape((nb, size) + x.shape[1:]), a)
                out = jax.lax.map(lambda x: jax.vmap(lambda *y: g(problem(*y)))(*x), a)
                return jax.tree_util.tree_map(lambda y: y.reshape((chunk,) + y.shape[2:]), out)
            return run

        rows = {}
        for name, g in catalogue_parts(spec).items():
            log(f"catalogue part {name} ...")
            t, _ = _time(blocked(g), args, repeats)
            rows[name] = {"ms_per_problem": 1e3 * t["seconds"] / chunk, "compile_s": t["compile_s"]}
    whole = rows["every bound (bounds='all')"]["ms_per_problem"]
    for v in rows.values():
        v["share_of_catalogue"] = v["ms_per_problem"] / whole
    return {"chunk": chunk, "finish_block": size, "parts": rows}


def catalogue_lines(prof: dict[str, Any]) -> list[str]:
    out = [f"catalogue by part ({prof['chunk']} W1 problems, blocks of {prof['finish_block']}, each part alone):"]
    for name, v in prof["parts"].items():
        out.append(f"  {name:54s} {v['ms_per_problem']:7.3f} ms/problem  {100 * v['share_of_catalogue']:5.1f}%")
    return out


def profile(chunk: int, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    from rlhf_bounds import engine, learners
    spec = common.w1_spec(W1).validate()
    f = stage_functions(spec)
    pk, sk = engine.problem_keys(seed)
    idx = jnp.arange(chunk, dtype=jnp.int32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(pk, idx)
    mb = learners.minibatch_indices(spec, sk)
    from rlhf_bounds.simulate import default_finish_block
    fb = default_finish_block()

    def V(fn, axes):
        """vmap over the chunk; in blocks of ``fb`` problems (lax.map) as the engine runs its finishing stages."""
        if fb is None or fb >= chunk or axes != 0 or chunk % fb:
            return jax.vmap(fn, in_axes=axes)
        nb = chunk // fb

        def blocked(*a):  # lax.map(batch_size=) cannot restack zero-size outputs (the world's empty basis)
            a = jax.tree_util.tree_map(lambda x: x.reshape((nb, fb) + x.shape[1:]), a)
            out = jax.lax.map(lambda x: jax.vmap(fn)(*x), a)
            return jax.tree_util.tree_map(lambda y: y.reshape((chunk,) + y.shape[2:]), out)
        return blocked

    res, outs = {}, {}
    log(f"whole engine kernel, chunk {chunk} ...")
    res["whole"], _ = _time(lambda i: engine.chunk_kernel(spec, pk, sk, i), (idx,), repeats)
    log("stages ...")
    res["draw"], d = _time(V(f["draw"], 0), (keys,), repeats)
    res["reward_fit"], fit = _time(V(f["fit"], 0), (d,), repeats)
    res["sgd"], pol = _time(f["sgd_batch"], (d, fit.theta, mb), repeats)
    res["evaluation"], (pop, stats, log_mu) = _time(V(f["evaluation"], 0), (d, fit.theta, pol.w_last), repeats)
    res["evaluation_no_quantiles"], _ = _time(V(f["evaluation_no_quantiles"], 0), (d, fit.theta, pol.w_last),
                                              repeats)
    res["j_hat"], _ = _time(V(f["j_hat"], 0), (d, fit.theta, pol.w_last, pop), repeats)
    cat = catalogue_functions(spec)
    if cat:
        for name, fn in cat.items():
            log(f"{name} ...")
            try:
                res[name], _ = _time(V(fn, 0), (d, fit.theta, fit.grad_norm, pol.w_last, stats, pop, log_mu), repeats)
            except Exception as err:  # the catalogue is being written concurrently
                res[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
    main = ["draw", "reward_fit", "sgd", "evaluation", "j_hat"] + (["catalogue"] if "catalogue" in res and
                                                                     "seconds" in res["catalogue"] else [])
    total = sum(res[k]["seconds"] for k in main)
    table = {}
    for k, v in res.items():
        if "seconds" not in v:
            continue
        table[k] = {"ms_per_chunk": 1e3 * v["seconds"], "ms_per_problem": 1e3 * v["seconds"] / chunk,
                    "share_of_stage_sum": v["seconds"] / total if k in main else None,
                    "share_of_whole": v["seconds"] / res["whole"]["seconds"], "compile_s": v["compile_s"]}
    table["quantiles (evaluation − evaluation_no_quantiles)"] = {
        "ms_per_chunk": 1e3 * (res["evaluation"]["seconds"] - res["evaluation_no_quantiles"]["seconds"])}
    return {"chunk": chunk, "stages": table, "raw": res, "stage_sum_s": total, "main_stages": main,
            "data": (d, fit, pol, mb, keys)}


# ---- variants ---------------------------------------------------------------------------------
def sgd_engine_unrolled(spec, unroll: int):
    """The engine's SGD maths (learners.rollout_gradient, full_gradient), lax.scan unrolled ``unroll``×."""
    from rlhf_bounds import learners
    beta, tau = spec.beta, learners.training_tau(spec)

    def run(phi, reward, u, w_ref, idx):
        data = learners.TrainData(phi, reward, u)

        def step(w, ib):
            g = jax.vmap(learners.rollout_gradient, (None, None, 0, 0, 0, None, None, None))(
                w, w_ref, phi[ib], reward[ib], u[ib], beta, tau, spec.estimator)
            return w + spec.lr * jnp.mean(g, 0), None

        def ckpt(w, blk):
            w, _ = jax.lax.scan(step, w, blk, unroll=unroll)
            return w, (w, jnp.linalg.norm(learners.full_gradient(w, w_ref, data, beta, tau)))

        w, (tw, tg) = jax.lax.scan(ckpt, w_ref, idx.reshape(spec.steps // spec.record_every, spec.record_every, -1))
        return w, tg
    return run


def sgd_problem_last(spec, unroll: int = 5, explicit_fma: bool = True):
    """W1's SGD with the problem axis last: Φ [n, A, d, P], w [d, P], shared minibatch indices.

    The d-contraction is d multiply-adds of [.., P] slabs (XLA vectorises along P); the rollout
    gather is a one-hot over A; the score-function sum is Σ_a (c_a − (Σ_k adv_k) π_a) φ_a.
    """
    beta, tau, lr, K, b, A, d = spec.beta, spec.tau, spec.lr, spec.rollouts, spec.batch, spec.actions, spec.d
    ar = jnp.arange(A, dtype=jnp.int32)[None, None, :, None]

    def contract(ph, w):                       # ph [m, A, d, P], w [d, P] → [m, A, P]
        if explicit_fma:
            z = ph[:, :, 0, :] * w[0]
            for j in range(1, d):
                z = z + ph[:, :, j, :] * w[j]
            return z
        return jnp.sum(ph * w[None, None], axis=2)

    def log_softmax(z):                        # over axis 1 (A)
        m = jnp.max(z, axis=1, keepdims=True)
        s = z - m
        return s - jnp.log(jnp.sum(jnp.exp(s), axis=1, keepdims=True))

    def weighted_phi(coef, ph):                # coef [m, A, P], ph [m, A, d, P] → [d, P] (summed over m, A)
        return jnp.sum(coef[:, :, None, :] * ph, axis=(0, 1))

    def run(phi, reward, u, w_ref, idx):       # phi [n, A, d, P], reward [n, A, P], u [n, K, P], w_ref [d, P]
        lpref = log_softmax(contract(phi, w_ref))

        def step(w, ib):
            ph, r, uu, lr_ = phi[ib], reward[ib], u[ib], lpref[ib]
            lp = log_softmax(contract(ph, w))
            p = jnp.exp(lp)
            cdf = jnp.cumsum(p, axis=1)                                     # [b, A, P]
            y = jnp.sum(cdf[:, None, :, :] <= uu[:, :, None, :], axis=2)    # [b, K, P]
            onehot = (jnp.minimum(y, A - 1)[:, :, None, :] == ar).astype(F32)  # [b, K, A, P]
            ell_y = jnp.sum(onehot * (lp - lr_)[:, None], axis=2)
            R = jnp.sum(onehot * r[:, None], axis=2) - beta * jnp.clip(ell_y, -tau, tau)
            S = jnp.sum(R, axis=1, keepdims=True)
            adv = R - (S - R) / (K - 1)
            c = jnp.sum(adv[:, :, None, :] * onehot, axis=1)                # [b, A, P]
            coef = c - jnp.sum(adv, axis=1)[:, None, :] * p
            return w + (lr / (K * b)) * weighted_phi(coef, ph), None

        def full_grad_norm(w):
            lp = log_softmax(contract(phi, w))
            p = jnp.exp(lp)
            ell = lp - lpref
            h = reward - beta * jnp.clip(ell, -tau, tau)
            pc = p * (h - beta * (jnp.abs(ell) < tau))
            coef = pc - jnp.sum(pc, axis=1, keepdims=True) * p
            g = weighted_phi(coef, phi) / phi.shape[0]
            return jnp.sqrt(jnp.sum(g * g, axis=0))

        def ckpt(w, blk):
            w, _ = jax.lax.scan(step, w, blk, unroll=unroll)
            return w, (w, full_grad_norm(w))

        w, (tw, tg) = jax.lax.scan(ckpt, w_ref, idx.reshape(spec.steps // spec.record_every, spec.record_every, -1))
        return w, tg
    return run


def bisection_quantiles(values, weights, levels, iters: int = 40):
    """Weighted quantiles without a sort: bisection on the threshold, then snap to the next atom.

    F(v) = Σ w·1[x ≤ v] / Σ w; the smallest atom x with F(x) ≥ level. Each iteration is one
    vectorised masked sum over the M·A atoms for every level at once (no comparator sort).
    """
    v = values.reshape(-1)
    wt = weights.reshape(-1) / jnp.sum(weights)
    lv = jnp.asarray(levels, v.dtype)
    lo = jnp.full(lv.shape, -1.0, v.dtype)            # F(lo) = 0 < level
    hi = jnp.full(lv.shape, jnp.max(v), v.dtype)      # F(hi) = 1 ≥ level

    def body(_, b):
        lo, hi = b
        mid = 0.5 * (lo + hi)
        ok = jnp.sum(jnp.where(v[None, :] <= mid[:, None], wt[None, :], 0.0), axis=1) >= lv
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return jnp.min(jnp.where(v[None, :] > lo[:, None], v[None, :], jnp.inf), axis=1)


def variants(prof: dict[str, Any], chunks=(16, 32, 64, 128), repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    from rlhf_bounds import engine
    spec = common.w1_spec(W1).validate()
    chunk = prof["chunk"]
    d, fit, pol, mb, keys = prof["data"]
    out: dict[str, Any] = {}

    # 1. SGD variants on the same data
    phi = d["train"].phi                              # [P, n, A, d]
    reward = jnp.einsum("pnad,pd->pna", phi, fit.theta)
    u, w_ref = d["u_t"], d["world"].w_ref
    base = prof["raw"]["sgd"]["seconds"]
    sg = {"engine_train_policies": {"ms_per_chunk": 1e3 * base, "problems_per_s": chunk / base}}
    for unroll in (1, 5):
        log(f"SGD variant: engine maths, unroll={unroll} ...")
        fn = jax.vmap(sgd_engine_unrolled(spec, unroll), (0, 0, 0, 0, None))
        t, (w_e, _) = _time(fn, (phi, reward, u, w_ref, mb), repeats)
        sg[f"engine_maths_unroll{unroll}"] = {"ms_per_chunk": 1e3 * t["seconds"],
                                              "problems_per_s": chunk / t["seconds"], "compile_s": t["compile_s"],
                                              "max_abs_dw_vs_engine": float(jnp.max(jnp.abs(w_e - pol.w_last)))}
    phiT = jnp.transpose(phi, (1, 2, 3, 0))
    rT, uT, wT = jnp.transpose(reward, (1, 2, 0)), jnp.transpose(u, (1, 2, 0)), jnp.transpose(w_ref, (1, 0))
    for unroll, fma in ((1, True), (5, True), (5, False), (10, True)):
        name = f"problem_last_unroll{unroll}_{'fma' if fma else 'sum'}"
        log(f"SGD variant: {name} ...")
        t, (w_l, tg) = _time(sgd_problem_last(spec, unroll, fma), (phiT, rT, uT, wT, mb), repeats)
        dw = jnp.abs(jnp.transpose(w_l) - pol.w_last)
        sg[name] = {"ms_per_chunk": 1e3 * t["seconds"], "problems_per_s": chunk / t["seconds"],
                    "compile_s": t["compile_s"], "max_abs_dw_vs_engine": float(jnp.max(dw)),
                    "problems_differing_dw_gt_1e-3": int(jnp.sum(jnp.max(dw, axis=1) > 1e-3)),
                    "max_rel_grad_norm_diff": float(jnp.max(jnp.abs(jnp.transpose(tg) - pol.traj_grad_norm)
                                                            / pol.traj_grad_norm))}
    t, _ = _time(lambda x: jnp.transpose(x, (1, 2, 3, 0)), (phi,), repeats)
    sg["transpose_to_problem_last_ms"] = 1e3 * t["seconds"]
    out["sgd"] = sg

    # 1b. weighted quantiles of |ℓ| on the evaluation set: the engine's gap.weighted_quantiles (a sort at first,
    #     exact bisection on ordered keys since 2a619a8) vs a float-threshold bisection (bisection_quantiles)
    from rlhf_bounds import gap
    try:
        ev = jax.jit(jax.vmap(stage_functions(spec)["evaluation"]))(d, fit.theta, pol.w_last)
        stats = ev[1]
        levels = gap.QUANTILE_LEVELS
        t_sort, q_sort = _time(jax.vmap(lambda a, w: gap.weighted_quantiles(a, w, levels)),
                               (stats.abs_log_ratio, stats.prob), repeats)
        t_bis, q_bis = _time(jax.vmap(lambda a, w: bisection_quantiles(a, w, levels)),
                             (stats.abs_log_ratio, stats.prob), repeats)
        out["quantiles"] = {"engine_ms_per_chunk": 1e3 * t_sort["seconds"],
                            "float_bisection_ms_per_chunk": 1e3 * t_bis["seconds"],
                            "max_abs_diff": float(jnp.max(jnp.abs(q_sort - q_bis))),
                            "fraction_equal": float(jnp.mean(q_sort == q_bis))}
    except Exception as err:
        out["quantiles"] = {"error": str(err)[:200]}

    # 2. PRNG implementations for the draw stage
    f = stage_functions(spec)
    pr = {}
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        log(f"draw stage with PRNG {impl} ...")
        root = jax.random.key(seed, impl=impl)
        ks = jax.vmap(jax.random.fold_in, (None, 0))(root, jnp.arange(chunk, dtype=jnp.int32))
        try:
            t, _ = _time(jax.vmap(f["draw"]), (ks,), repeats)
            pr[impl] = {"ms_per_chunk": 1e3 * t["seconds"], "compile_s": t["compile_s"]}
        except Exception as err:
            pr[impl] = {"error": str(err)[:200]}
    out["prng_draw_stage"] = pr

    # 3. whole kernel vs chunk size
    cs = {}
    pk, sk = engine.problem_keys(seed)
    for c in chunks:
        log(f"whole kernel at chunk {c} ...")
        i = jnp.arange(c, dtype=jnp.int32)
        t, _ = _time(lambda i: engine.chunk_kernel(spec, pk, sk, i),
                     (i,), repeats)
        cs[c] = {"problems_per_s": c / t["seconds"], "compile_s": t["compile_s"], "s_per_chunk": t["seconds"]}
    out["chunk_size"] = cs
    return out


def main(args) -> dict[str, Any]:
    from rlhf_bounds import engine
    chunk = args.chunk or engine.default_chunk_size(common.w1_spec(W1).validate())
    # the engine's threefry mode (engine.compile_chunk), so the stages draw as the engine does
    with jax.threefry_partitionable(False):
        prof = profile(chunk, repeats=args.repeats, seed=args.seed)
    whole = prof["raw"]["whole"]["seconds"]
    print(f"profile W1 stages, chunk {chunk} ({chunk / whole:.1f} problems/s whole kernel, "
          f"{1e3 * whole:.0f} ms per chunk; stage sum {1e3 * prof['stage_sum_s']:.0f} ms):")
    for k, v in prof["stages"].items():
        share = v.get("share_of_stage_sum")
        print(f"  {k:52s} {v['ms_per_chunk']:9.1f} ms/chunk"
              + (f"  {100 * share:5.1f}% of stage sum" if share is not None else "")
              + (f"  compile {v['compile_s']:.1f} s" if "compile_s" in v else ""))
    for k, v in prof["raw"].items():
        if "error" in v:
            print(f"  {k}: {v['error']}")
    result = {"workload": "profile", "chunk": chunk, "stages": prof["stages"], "stage_sum_s": prof["stage_sum_s"],
              "whole_problems_per_s": chunk / whole, "problems_per_s": chunk / whole, "ratio_r1": None,
              "ratio_r2": None, "roofline_fraction": None, "compile_s": prof["raw"]["whole"]["compile_s"],
              "peak_rss_mb": common.peak_rss_mb(), "machine": common.machine()}
    if args.variants:
        var = variants(prof, repeats=args.repeats, seed=args.seed)
        result["variants"] = var
        print("  SGD stage variants (same data, same minibatch indices):")
        for k, v in var["sgd"].items():
            if isinstance(v, dict):
                extra = "".join(f", {kk} {vv:.3g}" for kk, vv in v.items()
                                if kk not in ("ms_per_chunk", "problems_per_s"))
                print(f"    {k:34s} {v['ms_per_chunk']:9.1f} ms/chunk {v['problems_per_s']:9.1f} problems/s{extra}")
            else:
                print(f"    {k:34s} {v:9.1f} ms")
        q = var.get("quantiles", {})
        if "engine_ms_per_chunk" in q:
            print(f"  weighted quantiles of |ℓ| (6 levels, M·A = {W1.M * W1.A} atoms): engine gap.weighted_quantiles "
                  f"{q['engine_ms_per_chunk']:.1f} ms, float-threshold bisection "
                  f"{q['float_bisection_ms_per_chunk']:.1f} ms per chunk; max |diff| {q['max_abs_diff']:.2e}, "
                  f"equal {100 * q['fraction_equal']:.1f}%")
        print("  draw stage by PRNG: " + ", ".join(
            f"{k} {v['ms_per_chunk']:.1f} ms" if "ms_per_chunk" in v else f"{k} error" for k, v in
            var["prng_draw_stage"].items()))
        print("  whole kernel by chunk size: " + ", ".join(
            f"{c}: {v['problems_per_s']:.1f}/s (compile {v['compile_s']:.0f} s)" for c, v in var["chunk_size"].items()))
    result["peak_rss_mb"] = common.peak_rss_mb()
    result["line"] = f"profile: whole kernel {chunk / whole:.1f} problems/s at chunk {chunk}"
    return result
