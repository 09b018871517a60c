"""R2: plain JAX, jit(vmap(one_problem)) written straightforwardly (no layout or RNG tuning).

The same W1 algorithm as R1 and the engine (see r1_numpy.py's docstring), as one
function of a problem's key in float32, per-prompt maths vmapped over prompts,
the default PRNG, ``lax.scan`` without unrolling, each problem with its own
minibatch index sequence. It does not call the engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common import W1, W1Shape

F32 = jnp.float32
QUANTILE_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


def _unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def _inverse_cdf(p, u):
    cdf = jnp.cumsum(p)
    return jnp.minimum(jnp.sum(cdf[None, :] <= u[:, None], axis=-1), p.shape[0] - 1)


def make_one_problem(shape: W1Shape = W1):
    d, A, n, K, b, T = shape.d, shape.A, shape.n, shape.K, shape.b, shape.T
    beta, tau, lr = shape.beta, shape.tau, shape.lr

    def features(key, m):
        return shape.C * _unit(jax.random.normal(key, (m, A, d), F32))

    def log_pi(w, phi):                         # phi [A, d]
        return jax.nn.log_softmax(phi @ w)

    def prompt_objective(w, w_ref, phi, r):     # Σ_a π (r − β clip ℓ)
        lp = log_pi(w, phi)
        return jnp.sum(jnp.exp(lp) * (r - beta * jnp.clip(lp - log_pi(w_ref, phi), -tau, tau)))

    def rloo_gradient(w, w_ref, phi, r, u):
        lp = log_pi(w, phi)
        p = jnp.exp(lp)
        y = _inverse_cdf(p, u)
        R = r[y] - beta * jnp.clip(lp[y] - log_pi(w_ref, phi)[y], -tau, tau)
        adv = R - (jnp.sum(R) - R) / (K - 1)
        return adv @ (phi[y] - p @ phi) / K

    def one_problem(key):
        ks = jax.random.split(key, 12)
        theta = shape.D * _unit(jax.random.normal(ks[0], (d,), F32))
        w_ref = jnp.zeros((d,), F32)
        w_mu = shape.shift * theta / beta

        def log_mu(phi):
            return jnp.logaddexp(jnp.log1p(-shape.mix_eps) + log_pi(w_mu, phi), jnp.log(shape.mix_eps / A))

        # preference data and the ridge BT fit
        phi_p = features(ks[1], shape.n_pref)
        act = jax.vmap(lambda phi, u: _inverse_cdf(jnp.exp(log_mu(phi)), u))(
            phi_p, jax.random.uniform(ks[2], (shape.n_pref, 2), F32))
        rows = jnp.arange(shape.n_pref)
        u = phi_p[rows, act[:, 0]] - phi_p[rows, act[:, 1]]
        z = (jax.random.uniform(ks[3], (shape.n_pref,), F32) < jax.nn.sigmoid(u @ theta)).astype(F32)

        def grad_hess(th):
            q = jax.nn.sigmoid(u @ th)
            g = u.T @ (q - z) + shape.ridge * th
            h = (u * (q * (1 - q))[:, None]).T @ u + shape.ridge * jnp.eye(d, dtype=F32)
            return g, h

        def newton(th, _):
            g, h = grad_hess(th)
            return th - jnp.linalg.solve(h, g), None

        theta_hat, _ = jax.lax.scan(newton, jnp.zeros((d,), F32), None, length=shape.newton)
        fit_grad = jnp.linalg.norm(grad_hess(theta_hat)[0])

        # training data and SGD
        phi_t = features(ks[4], n)
        r_t = phi_t @ theta_hat
        U_t = jax.random.uniform(ks[5], (n, K), F32)
        idx = jax.random.randint(ks[6], (T, b), 0, n)

        def full_gradient(w):
            obj = lambda w: jnp.mean(jax.vmap(prompt_objective, (None, None, 0, 0))(w, w_ref, phi_t, r_t))
            return jax.grad(obj)(w)

        def step(w, ib):
            g = jnp.mean(jax.vmap(rloo_gradient, (None, None, 0, 0, 0))(w, w_ref, phi_t[ib], r_t[ib], U_t[ib]), 0)
            return w + lr * g, None

        def checkpoint(w, block):
            w, _ = jax.lax.scan(step, w, block)
            return w, (w, jnp.linalg.norm(full_gradient(w)))

        w, (traj_w, traj_g) = jax.lax.scan(checkpoint, w_ref, idx.reshape(shape.checkpoints, shape.record_every, b))
        best = jnp.argmin(traj_g)

        # evaluation on M prompts, exact over responses
        phi_e = features(ks[7], shape.M)

        def eval_prompt(phi):
            r_hat, r_star, lmu = phi @ theta_hat, phi @ theta, log_mu(phi)
            lp = log_pi(w, phi)
            p = jnp.exp(lp)
            ell = lp - log_pi(w_ref, phi)
            ell_tau = jnp.clip(ell, -tau, tau)
            diff = r_hat - r_star
            return dict(j_hat_mean=jnp.sum(p * (r_hat - beta * ell_tau)), j_star=jnp.sum(p * (r_star - beta * ell)),
                        reward_shift=jnp.sum(p * diff), clipping=beta * jnp.sum(p * (ell - ell_tau)),
                        tail_excess=jnp.sum(p * jnp.maximum(jnp.abs(ell) - tau, 0.0)), kl=jnp.sum(p * ell),
                        chi2=jnp.sum(jnp.exp(2 * lp - lmu)) - 1, l2_train=jnp.sum(jnp.exp(lmu) * diff * diff),
                        abs_ell=jnp.abs(ell), p=p)

        st = jax.vmap(eval_prompt)(phi_e)
        pop = {k: jnp.mean(v) for k, v in st.items() if k not in ("abs_ell", "p", "j_hat_mean", "j_star")}
        pop["J_hat_mean"] = jnp.mean(st["j_hat_mean"])
        pop["J_star"] = jnp.mean(st["j_star"])
        v, wt = st["abs_ell"].reshape(-1), st["p"].reshape(-1)
        order = jnp.argsort(v)
        v, cdf = v[order], jnp.cumsum(wt[order])
        cdf = cdf / cdf[-1]
        qi = jnp.searchsorted(cdf, jnp.asarray(QUANTILE_LEVELS, F32), side="left")
        q = v[jnp.minimum(qi, v.shape[0] - 1)]
        for i, lv in enumerate(QUANTILE_LEVELS):
            pop[f"abs_log_ratio_q{100 * lv:g}".replace(".", "_")] = q[i]

        # Ĵ on a fresh sample and on the training sample
        def sample_objective(phi, r, uu):
            def one(phi_i, r_i, u_i):
                lp = log_pi(w, phi_i)
                p = jnp.exp(lp)
                h = r_i - beta * jnp.clip(lp - log_pi(w_ref, phi_i), -tau, tau)
                return jnp.mean(h[_inverse_cdf(p, u_i)]), jnp.sum(p * h)
            a, e = jax.vmap(one)(phi, r, uu)
            return jnp.mean(a), jnp.mean(e)

        phi_f = features(ks[8], n)
        j_fresh = sample_objective(phi_f, phi_f @ theta_hat, jax.random.uniform(ks[9], (n, K), F32))
        j_train = sample_objective(phi_t, r_t, U_t)
        out = {}
        for suffix, (j_hat, j_prompts) in (("", j_fresh), ("_train", j_train)):
            out.update({
                f"J_hat{suffix}": j_hat, f"gap_total{suffix}": j_hat - pop["J_star"],
                f"gap_sampling{suffix}": j_hat - pop["J_hat_mean"],
                f"gap_sampling_prompt{suffix}": j_prompts - pop["J_hat_mean"],
                f"gap_sampling_rollout{suffix}": j_hat - j_prompts,
                f"gap_reward_shift{suffix}": pop["reward_shift"], f"gap_clipping{suffix}": pop["clipping"]})
        out.update(pop)
        th_norm = jnp.linalg.norm(theta_hat)
        out.update(reward_error=jnp.linalg.norm(theta_hat - theta), reward_fit_grad_norm=fit_grad,
                   reward_range=2.0 * th_norm * shape.C, w_norm=jnp.linalg.norm(w - w_ref),
                   policy_grad_norm_last=traj_g[-1], policy_grad_norm_best=traj_g[best], w_best=traj_w[best])
        return out

    return one_problem


def make_kernel(shape: W1Shape = W1):
    """jit(vmap(one_problem)) over the problem indices of a chunk (key_i = fold_in(root, i))."""
    one = make_one_problem(shape)

    def chunk(root, idx):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(root, idx)
        return jax.vmap(one)(keys)

    return jax.jit(chunk)
