"""R1: the W1 algorithm written the way a careful user would in NumPy.

Vectorised over a block of problems with einsum (problem axis first), float32,
with the same counts of steps and samples as the engine's W1 (benchmarks/README.md):

1. world: θ* = D·u (u uniform on the sphere), w_ref = 0, w_μ = s·θ*/β; behaviour
   μ = (1−ε)·π_{w_μ} + ε·uniform; features `sphere` (rows uniform on the sphere of radius C);
2. preference data: N_pref fresh prompts, two responses from μ by inverse CDF, Bradley-Terry labels;
3. ridge BT fit by 8 Newton steps from θ = 0;
4. SGD, T steps, minibatch b (one index sequence shared by the problems, as the engine does),
   rollouts Y_ik = F^{-1}_{π_w(·|x_i)}(U_ik) at the prompt's fixed uniforms, score-function gradient
   with the RLOO baseline, reward r̂ − β·clip(ℓ, −τ, τ); every `record_every` steps the exact
   full-batch gradient norm (for the best-gradient iterate), as the engine does;
5. evaluation on M fresh prompts, exact over responses (J*, reward shift, clipping, tail, KL, χ²
   against μ, L²_train, weighted quantiles of |ℓ|);
6. Ĵ on a fresh sample of n prompts and K rollouts (and on the training sample), the gap terms;
7. B1's three terms (computed from the columns in float64 by ``common.b1_terms``).

The misspecification residual ξ is not drawn: W1 is realizable (σ_ξ = 0).
"""

from __future__ import annotations

import numpy as np

from common import W1, W1Shape

F32 = np.float32
QUANTILE_LEVELS = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    s = z - m
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, in place."""
    norm = np.sqrt(np.einsum("...d,...d->...", x, x))
    x /= np.maximum(norm, F32(1e-30))[..., None]
    return x


def _features(rng, shape: W1Shape, P: int, m: int) -> np.ndarray:
    """Sphere law: [P, m, A, d] rows uniform on the sphere of radius C."""
    g = _unit_rows(rng.standard_normal((P, m, shape.A, shape.d), dtype=F32))
    if shape.C != 1.0:
        g *= F32(shape.C)
    return g


def _inverse_cdf(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """p [..., A], u [..., K] → int [..., K]: min{a : cdf_a > u}."""
    cdf = np.cumsum(p, axis=-1)
    idx = (cdf[..., None, :] <= u[..., :, None]).sum(axis=-1)
    return np.minimum(idx, p.shape[-1] - 1)


def _sigmoid(x):
    return F32(1.0) / (F32(1.0) + np.exp(-x))


def _simulate_block(shape: W1Shape, P: int, rng, idx: np.ndarray) -> dict[str, np.ndarray]:
    d, A, n, K, b = shape.d, shape.A, shape.n, shape.K, shape.b
    beta, tau = F32(shape.beta), F32(shape.tau)
    pi = np.arange(P)[:, None]

    # ---- world ----------------------------------------------------------------------------
    theta = (shape.D * _unit_rows(rng.standard_normal((P, d), dtype=F32))).astype(F32)
    w_ref = np.zeros((P, d), F32)
    w_mu = (shape.shift * theta / shape.beta).astype(F32)
    log_eps = np.log(F32(shape.mix_eps)) - np.log(F32(A))
    log_1m_eps = np.log1p(F32(-shape.mix_eps))

    def log_mu_of(phi):
        return np.logaddexp(log_1m_eps + _log_softmax(np.einsum("pmad,pd->pma", phi, w_mu)), log_eps)

    # ---- preference data and the BT fit ---------------------------------------------------
    Np = shape.n_pref
    phi_p = _features(rng, shape, P, Np)
    act = _inverse_cdf(np.exp(log_mu_of(phi_p)), rng.random((P, Np, 2), dtype=F32))
    ni = np.arange(Np)[None, :]
    phi_a, phi_b = phi_p[pi, ni, act[..., 0]], phi_p[pi, ni, act[..., 1]]       # [P, Np, d]
    u = phi_a - phi_b
    margin = np.einsum("pnd,pd->pn", u, theta)
    z = (rng.random((P, Np), dtype=F32) < _sigmoid(margin)).astype(F32)
    eye = np.eye(d, dtype=F32)
    th = np.zeros((P, d), F32)

    def grad_hess(th):
        s = np.einsum("pnd,pd->pn", u, th)
        q = _sigmoid(s)
        g = np.einsum("pnd,pn->pd", u, q - z) + shape.ridge * th
        h = np.matmul(u.transpose(0, 2, 1) * (q * (1 - q))[:, None, :], u) + shape.ridge * eye
        return g, h

    for _ in range(shape.newton):
        g, h = grad_hess(th)
        th = (th - np.linalg.solve(h, g[..., None])[..., 0]).astype(F32)
    g, _ = grad_hess(th)
    fit_grad = np.sqrt((g * g).sum(-1))
    theta_hat = th

    # ---- training data and SGD ------------------------------------------------------------
    phi_t = _features(rng, shape, P, n)
    r_t = np.einsum("pnad,pd->pna", phi_t, theta_hat)
    U_t = rng.random((P, n, K), dtype=F32)
    lpref_t = _log_softmax(np.einsum("pnad,pd->pna", phi_t, w_ref))   # fixed: computed once
    arangeA = np.arange(A)

    def full_grad_norm(w):
        lp = _log_softmax(np.einsum("pnad,pd->pna", phi_t, w))
        p = np.exp(lp)
        ell = lp - lpref_t
        h = r_t - beta * np.clip(ell, -tau, tau)
        coef = p * (h - beta * (np.abs(ell) < tau))                 # d/dw of Σ_a π_a (r̂ − β clip ℓ)
        phibar = np.einsum("pna,pnad->pnd", p, phi_t)
        gf = np.einsum("pna,pnad->pd", coef, phi_t) - np.einsum("pn,pnd->pd", coef.sum(-1), phibar)
        gf /= n
        return np.sqrt((gf * gf).sum(-1))

    w = w_ref.copy()
    traj_w, traj_g = [], []
    for t in range(shape.T):
        ib = idx[t]
        ph = phi_t[:, ib]                                            # [P, b, A, d]
        lp = _log_softmax(np.einsum("pbad,pd->pba", ph, w))
        p = np.exp(lp)
        y = _inverse_cdf(p, U_t[:, ib])                              # [P, b, K]
        ell_y = np.take_along_axis(lp - lpref_t[:, ib], y, axis=-1)
        R = np.take_along_axis(r_t[:, ib], y, axis=-1) - beta * np.clip(ell_y, -tau, tau)
        adv = R - (R.sum(-1, keepdims=True) - R) / F32(K - 1)
        c = (adv[..., None] * (y[..., None] == arangeA)).sum(-2)     # [P, b, A]: Σ_k adv_k 1[y_k = a]
        phibar = np.einsum("pba,pbad->pbd", p, ph)
        g = np.einsum("pba,pbad->pd", c, ph) - np.einsum("pb,pbd->pd", adv.sum(-1), phibar)
        w = w + F32(shape.lr / (K * b)) * g
        if (t + 1) % shape.record_every == 0:
            traj_w.append(w)
            traj_g.append(full_grad_norm(w))
    traj_g = np.stack(traj_g, axis=1)                                # [P, J]
    best = traj_g.argmin(axis=1)

    # ---- evaluation on M prompts, exact over responses ------------------------------------
    phi_e = _features(rng, shape, P, shape.M)
    r_hat = np.einsum("pmad,pd->pma", phi_e, theta_hat)
    r_star = np.einsum("pmad,pd->pma", phi_e, theta)
    log_mu = log_mu_of(phi_e)
    lp = _log_softmax(np.einsum("pmad,pd->pma", phi_e, w))
    lpref = _log_softmax(np.einsum("pmad,pd->pma", phi_e, w_ref))
    del phi_e
    p = np.exp(lp)
    ell = lp - lpref
    ell_tau = np.clip(ell, -tau, tau)
    abs_ell = np.abs(ell)
    diff = r_hat - r_star
    j_hat_mean = (p * (r_hat - beta * ell_tau)).sum(-1)
    j_star = (p * (r_star - beta * ell)).sum(-1)
    pop = {
        "J_hat_mean": j_hat_mean.mean(-1),
        "J_star": j_star.mean(-1),
        "J_star_se": j_star.std(-1) / np.sqrt(F32(shape.M)),
        "reward_shift": (p * diff).sum(-1).mean(-1),
        "clipping": beta * (p * (ell - ell_tau)).sum(-1).mean(-1),
        "tail_excess": (p * np.maximum(abs_ell - tau, 0)).sum(-1).mean(-1),
        "kl": (p * ell).sum(-1).mean(-1),
        "chi2": (np.exp(2 * lp - log_mu).sum(-1) - 1).mean(-1),
        "l2_train": (np.exp(log_mu) * diff * diff).sum(-1).mean(-1),
    }
    v = abs_ell.reshape(P, -1)
    wt = p.reshape(P, -1)
    order = np.argsort(v, axis=1)
    v, wt = np.take_along_axis(v, order, 1), np.take_along_axis(wt, order, 1)
    cdf = np.cumsum(wt, axis=1)
    cdf /= cdf[:, -1:]
    for lv in QUANTILE_LEVELS:
        q = np.minimum((cdf < lv).sum(1), v.shape[1] - 1)
        pop[f"abs_log_ratio_q{100 * lv:g}".replace(".", "_")] = v[np.arange(P), q]

    # ---- Ĵ on a fresh sample and on the training sample -----------------------------------
    def sample_objective(phi, r, uu):
        lp = _log_softmax(np.einsum("pnad,pd->pna", phi, w))
        p = np.exp(lp)
        h = r - beta * np.clip(lp - _log_softmax(np.einsum("pnad,pd->pna", phi, w_ref)), -tau, tau)
        y = _inverse_cdf(p, uu)
        return np.take_along_axis(h, y, -1).mean((-1, -2)), (p * h).sum(-1).mean(-1)

    phi_f = _features(rng, shape, P, n)
    U_f = rng.random((P, n, K), dtype=F32)
    j_fresh = sample_objective(phi_f, np.einsum("pnad,pd->pna", phi_f, theta_hat), U_f)
    j_train = sample_objective(phi_t, r_t, U_t)

    out = {}
    for suffix, (j_hat, j_prompts) in (("", j_fresh), ("_train", j_train)):
        out.update({
            f"J_hat{suffix}": j_hat,
            f"gap_total{suffix}": j_hat - pop["J_star"],
            f"gap_sampling{suffix}": j_hat - pop["J_hat_mean"],
            f"gap_sampling_prompt{suffix}": j_prompts - pop["J_hat_mean"],
            f"gap_sampling_rollout{suffix}": j_hat - j_prompts,
            f"gap_reward_shift{suffix}": pop["reward_shift"],
            f"gap_clipping{suffix}": pop["clipping"],
        })
    out.update(pop)
    th_norm = np.sqrt((theta_hat * theta_hat).sum(-1))
    out.update(
        reward_error=np.sqrt(((theta_hat - theta) ** 2).sum(-1)),
        reward_fit_grad_norm=fit_grad,
        reward_range=2.0 * th_norm * shape.C,
        w_norm=np.sqrt(((w - w_ref) ** 2).sum(-1)),
        policy_grad_norm_last=traj_g[:, -1],
        policy_grad_norm_best=traj_g[np.arange(P), best],
    )
    return out


def simulate(shape: W1Shape = W1, problems: int = 256, seed: int = 0, block: int = 64) -> dict[str, np.ndarray]:
    """``problems`` independent W1 problems, ``block`` at a time; per-problem columns (NumPy arrays)."""
    idx = np.random.default_rng([seed, 2**31 - 1]).integers(0, shape.n, size=(shape.T, shape.b))
    outs = []
    for start in range(0, problems, block):
        P = min(block, problems - start)
        rng = np.random.default_rng([seed, start])
        outs.append(_simulate_block(shape, P, rng, idx))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


if __name__ == "__main__":  # quick look
    import sys
    import time
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    blk = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    t0 = time.perf_counter()
    res = simulate(W1, N, block=blk)
    dt = time.perf_counter() - t0
    print(f"R1 numpy: {N} problems in {dt:.2f}s = {N / dt:.1f} problems/s")
    for k in ("J_star", "gap_total", "gap_sampling", "gap_reward_shift", "gap_clipping", "reward_error",
              "reward_fit_grad_norm", "policy_grad_norm_best"):
        print(f"  {k:24s} {res[k].mean():+.5f} ± {res[k].std() / np.sqrt(N):.5f}")
